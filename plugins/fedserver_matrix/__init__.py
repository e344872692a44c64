"""
fedserver's Matrix federation plugin: discovery of Matrix server names,
Ed25519 signing keys and the key server, X-Matrix request signatures, the
keyring, and the federation routes with transactions.  See docs/matrix.md.
"""
