print("flotillad")
