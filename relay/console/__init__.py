"""`relay console`: the operators' web page over what the operator tools read (relay/ops):
handler states, partitions, dead letters (replay, purge), a webhook's journey, archive replays.

A process of its own, not a page of the ingress (its `admin_port`): the ingress is the hot path,
sized and exposed for providers, and must never wait on a page reading streams or dead-letter
queues; the console is for people, on loopback or behind a VPN, and needs sessions and forms
that the ingress has no business holding. Server-rendered (jinja2, autoescaping every value: a
webhook body is attacker-controlled), one CSS file and one small script, no build step.
"""
