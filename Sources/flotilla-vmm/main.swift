import Protocol
print("flotilla-vmm")
