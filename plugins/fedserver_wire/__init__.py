"""
fedserver's Wire federation plugin: DNS SRV discovery (C{wire-srv}) and the
reference brig and galley components.  See docs/wire.md.
"""
