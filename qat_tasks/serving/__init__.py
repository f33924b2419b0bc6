"""The HTTP service: each served encoder's @champion answers every request (intent, escalation, rerank), its
@shadow is mirrored in a process of its own from a bounded queue with deadlines, both answers are logged in the
traffic schema; and the offline replay of logged traffic through the same two models."""
