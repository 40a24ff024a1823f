"""One router per resource, as moby's ``api/server/router/*``: each module lists ``ROUTES``
(method, path, handler); a handler parses the request, makes one service call (through
``Api.call``: a worker thread) and writes docker's JSON. No rule lives here."""
