print("flotillactl")
