// The VMM library; see DESIGN.md for its layout.
