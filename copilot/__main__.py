from copilot.cli import entry

entry()
