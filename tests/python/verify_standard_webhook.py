"""Verifies one signed callback with the official Standard Webhooks library (`standardwebhooks`).

Environment: ``SECRET`` (``whsec_…``), ``WEBHOOK_ID``, ``WEBHOOK_TIMESTAMP``,
``WEBHOOK_SIGNATURE`` and ``BODY``. Exits 0 when the library accepts the message (it also checks
that the timestamp is within five minutes of now), 1 with the library's complaint otherwise.
"""

import os
import sys

from standardwebhooks.webhooks import Webhook

headers = {
    "webhook-id": os.environ["WEBHOOK_ID"],
    "webhook-timestamp": os.environ["WEBHOOK_TIMESTAMP"],
    "webhook-signature": os.environ["WEBHOOK_SIGNATURE"],
}
try:
    Webhook(os.environ["SECRET"]).verify(os.environ["BODY"], headers)
except Exception as error:  # the library raises WebhookVerificationError and friends
    print(f"refused: {error!r}")
    sys.exit(1)
print("verified")
