"""CipherMQ: a secure message broker with end-to-end hybrid encryption.

The broker (``ciphermq.server``) never sees plaintext: senders seal each message
with the receiver's public key (``ciphermq.crypto``) and the broker only routes,
stores and redelivers opaque envelopes until a receiver acknowledges them.
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
