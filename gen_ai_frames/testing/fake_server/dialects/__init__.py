"""The vendors' wire formats the fake server speaks, one module each."""
