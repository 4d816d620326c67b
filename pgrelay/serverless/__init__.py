"""The serverless endpoint: Neon's HTTP /sql and WebSocket protocols on listeners of role=serverless.

Modules: plugin (the built-in plugin: settings, the listener kind), endpoint (one greenlet per
HTTP connection), bridge (a PostgreSQL client carried by HTTP or WebSocket, handed to the core
over a socketpair), websocket (WebSocket frames <-> the bridge), sql_over_http (POST /sql),
pgjson (PostgreSQL text values as JSON).
"""
