"""Tenant isolation and hardening: development PKI, Mosquitto password entries and the ACL file.

- :mod:`forgeline.security.pki` makes a development CA with server and client certificates.
- :mod:`forgeline.security.passwords` writes Mosquitto 2 password entries (PBKDF2-SHA512, ``$7$``).
- :mod:`forgeline.security.acl` generates the broker ACL from the topic contract, so the ACL
  cannot drift from :mod:`forgeline.contract.topics`.

See ``docs/security.md`` for the threat model and what is guaranteed.
"""
