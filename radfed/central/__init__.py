"""What runs centrally: the ServerApp's work (``server``), its round loop with bounded
waiting and resume (``rounds``), the strategies with radfed's reply checks (``strategy``),
and the run folder (``run_folder``). Nothing here imports a site's code."""

__all__: list[str] = []
