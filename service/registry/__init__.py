"""The policy registry as its one writer (the gate) and its readers (the gateway replicas) share it.

`book` (versions, scores, the promoted version, pins, history, and the
promotion rules), `control_log` (the control topic's messages and how a
reader folds them into a book), `follower` (the thread that reads the topic),
`metrics` (what a reader holds).
"""
