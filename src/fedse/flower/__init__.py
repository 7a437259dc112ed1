"""fedse on Flower: the same federation with each client on its own machine (see the README).

server_app (the ServerApp: `Federation` with the clients behind Flower's Grid), client_app and
node (the ClientApp: one client's round on its machine), worker (keeps the base model loaded
across messages), codec (message records, bytes on the wire), certificates (TLS and node keys),
commands (SuperLink, SuperNode and `flwr run` commands), processes (a node beside its worker,
child processes), local (a whole deployment on one machine), cli (`fedse flower ...`).
"""
