"""What runs at a hospital: the ClientApp's handlers and what may leave (``handlers``,
``egress``, ``node``, ``fedbn``), and the site administrator's local tools (``evaluate``,
``explain``, ``check``, ``index``). Nothing here imports the server's code."""

__all__: list[str] = []
