"""``celery`` with a slowed encoder: ``python -m tests.slow_worker -A project worker ...``.

The tiny test model encodes in milliseconds, too fast for a test to edit a
row while a worker encodes it. Here every ``Encoder.encode()`` call first
sleeps SEMANTIC_TEST_ENCODE_DELAY seconds (with the claim's advisory locks
held, as during a real encode). Everything else is the real worker: the real
model, pipeline, database and broker.
"""

import os
import sys
import time

from celery.__main__ import main

from semantic.encoders import Encoder

DELAY = float(os.environ.get("SEMANTIC_TEST_ENCODE_DELAY", "0"))
_encode = Encoder.encode


def encode_slowly(self, texts, **kwargs):
    time.sleep(DELAY)
    return _encode(self, texts, **kwargs)


Encoder.encode = encode_slowly

if __name__ == "__main__":
    sys.exit(main())
