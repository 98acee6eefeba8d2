"""The wire contract between a site and the server: what travels, and how it is checked.

Both sides import it; it imports neither (``radfed.site``, ``radfed.central``).

- ``codes``: the error codes a site replies with, and ``InvalidReply``;
- ``identity``: who replied (site name, radfed and schema versions);
- ``schema``: the statistics schema of evaluation replies, and the training reply's keys;
- ``updates``: checks of a weight update against the global model;
- ``weights``: which weights travel (FedBN keeps normalisation layers at the site);
- ``packing``: how they travel: one byte array, read by the receiver's own model;
- ``checkpoint``: the stored global model, written centrally and read at a site.
"""

__all__: list[str] = []
