// The supervisor library.
