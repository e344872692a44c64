"""
fedserver's built-in plugins.  Each module is registered as an entry point
of the C{fedserver} group in setup.cfg, exactly as a third-party plugin is.
"""
