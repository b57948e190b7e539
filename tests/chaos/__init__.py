"""The seeded fault-injection harness (issue 10 §4): every fault at once, then an exact accounting."""
