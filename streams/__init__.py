"""The Faust stream worker and everything around it: settings, records, state, publishing, CLI."""
