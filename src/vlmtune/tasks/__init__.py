"""Task apps: environments a collector runs a policy against (see ``protocol.py``)."""
