"""report.json and report.md, the sentences they show (messages.py), charts and the HTML page."""
