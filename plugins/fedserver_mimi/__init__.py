"""
fedserver's MIMI plugin: the identity providers of the MIMI gateway draft
(C{basic} and C{x509}, in L{fedserver_mimi.identity}).
"""
