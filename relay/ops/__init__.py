"""Operator tools: what `relay status`, `relay topology declare`, `relay dlq` and `relay send`
do. The ingress and the worker never import them."""
