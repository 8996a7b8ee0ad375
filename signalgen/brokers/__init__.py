"""Message brokers, as wires: connections, names and the entry codec (Redis, Pub/Sub).

Nothing here decides anything: the transports (`signalgen.transports`) build sinks, decision hosts
and feeds on top of these modules, and the data, output and storage layers use them to read and
write entries. Each broker's client library is imported only when it is used.
"""
