"""How radfed's Flower processes are started: simulated on one machine (``simulation``), or
deployed with certificates (``pki``, ``certs``) as a SuperLink (``superlink``), site
SuperNodes (``supernode``) and runs launched against them (``launch``), each through
``process``. It starts the app, and never imports the site's or the server's code."""

__all__: list[str] = []
