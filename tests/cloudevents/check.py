"""Parses every captured public event with the CloudEvents Python SDK's RabbitMQ protocol
binding (cloudevents 2.2.0, `cloudevents.core.bindings.rabbitmq.from_rabbitmq`, which picks
structured or binary content mode by the AMQP content_type) and checks what orderflow promises
of each: CloudEvents 1.0, source /orderflow/orders, the id the AMQP message_id, the type the
AMQP type, the subject the AMQP correlation_id (the order), a time, JSON data.

    python check.py MESSAGES.json

MESSAGES.json: a list of {"properties": {content_type, message_id, type, correlation_id},
"headers": {...}, "body": "<text>"} (what tests/asyncapi.rs writes for the AsyncAPI check).
The last line is `cloudevents: N passed, M failed`; exit 1 when any failed.
"""

import json
import sys

from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_rabbitmq
from cloudevents.core.formats.json import JSONFormat

SOURCE = "/orderflow/orders"


def check(message: dict) -> list[str]:
    props = message.get("properties", {})
    headers = {k: v for k, v in message.get("headers", {}).items() if isinstance(v, str)}
    amqp = RabbitMQMessage(
        headers=headers,
        content_type=props.get("content_type"),
        body=message["body"].encode("utf-8"),
    )
    try:
        event = from_rabbitmq(amqp, JSONFormat())
    except Exception as e:  # the SDK's own validation errors, whatever their class
        return [f"the SDK cannot read it: {type(e).__name__}: {e}"]
    problems = []
    expected = {
        "specversion": "1.0",
        "source": SOURCE,
        "id": props.get("message_id"),
        "type": props.get("type"),
        "subject": props.get("correlation_id"),
        "datacontenttype": "application/json",
    }
    attributes = event.get_attributes()
    for name, want in expected.items():
        if attributes.get(name) != want:
            problems.append(f"{name} is {attributes.get(name)!r}, not {want!r}")
    if attributes.get("time") is None:
        problems.append("no time")
    if not isinstance(event.get_data(), dict):
        problems.append(f"data is {type(event.get_data()).__name__}, not a JSON object")
    return problems


def main() -> int:
    messages = json.load(open(sys.argv[1], encoding="utf-8"))
    failed = 0
    for i, message in enumerate(messages):
        problems = check(message)
        if problems:
            failed += 1
            print(f"FAIL message {i} ({message.get('properties', {}).get('message_id')}): " + "; ".join(problems))
    print(f"cloudevents: {len(messages) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
