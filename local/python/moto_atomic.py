"""moto's server, with each DynamoDB request handled whole before the next one starts.

DynamoDB applies a conditional write atomically: the condition is checked and the item written
as one step, so of two concurrent writes conditioned on the same state only one succeeds.
moto's server is threaded and its DynamoDB model checks a condition and then writes, so two
requests can both pass one condition (seen: 6 of 20 concurrent token spends admitted where the
bucket held 5). The gateway's correctness rests on DynamoDB's guarantee (versioned writes,
leases, slots, rate tokens), so the local stack and the tests run moto with it: one lock around
every DynamoDB action. Other services keep moto's threads (SQS long polls must not block them).

Usage: python moto_atomic.py [moto_server's arguments]
"""

import sys
import threading

from moto.dynamodb.responses import DynamoHandler
from moto.server import main

_lock = threading.Lock()
_call_action = DynamoHandler.call_action


def _atomic_call_action(self):
    with _lock:
        return _call_action(self)


DynamoHandler.call_action = _atomic_call_action

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
