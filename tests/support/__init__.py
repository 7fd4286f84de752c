"""Test helpers shared by the suites: database resets and service processes."""
