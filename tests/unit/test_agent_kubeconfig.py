"""``mailtls agent --kubeconfig``: the kubeconfig's token goes into every request (the
official loader files it under a key that changed between client versions; a miss made
the agent anonymous, which only a real, authorizing API server showed)."""

from __future__ import annotations

from pathlib import Path

from mailtls_operator.agent.api import AgentApi


def test_the_kubeconfig_token_is_sent_as_a_bearer_token(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\n"
                    "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                    "users: [{name: u, user: {token: abc.def}}]\n"
                    "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
                    "current-context: c\n")
    api = AgentApi.from_kubeconfig(str(path))
    assert api._headers()["Authorization"] == "Bearer abc.def"
