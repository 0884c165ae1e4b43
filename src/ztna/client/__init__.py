"""The scriptable test client (`ztna client`): see `ztna.client.testclient`."""

from ztna.client.testclient import ClientOptions, run_client, run_query_sweep

__all__ = ["ClientOptions", "run_client", "run_query_sweep"]
