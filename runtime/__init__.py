"""Runtime state of compressed models: the record of compressed layers and save/load."""
