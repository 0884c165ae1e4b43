"""The Intermediate's admin API and live dashboard (`ztna intermediate --admin HOST:PORT`).

* `snapshot`: what the admin side may see and do, as plain frozen data and a small
  `AdminSource` Protocol the Intermediate implements (it never reaches into the server).
* `models`: the Pydantic models of every JSON body; the OpenAPI document is built from them.
* `http`: the aiohttp application (access control, metrics, SSE) and its runner.
* `static/`: the dashboard, plain HTML/CSS/JS served as files (no build step).
"""
