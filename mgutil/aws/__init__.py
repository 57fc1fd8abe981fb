"""AWS helpers: client factory, spot pricing, readiness checks, launch and bootstrap.

Functions here take boto3 clients as arguments, so tests hand in clients pointed at a
local server; :func:`mgutil.aws.clients.make_client` builds the default ones.
"""
