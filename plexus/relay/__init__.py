"""The flow relay: every node of every connected cluster in one time-ordered stream, its API and web page."""
