"""The Visual Decathlon (many-to-many classification over ten domains) as one plugin.

- :mod:`.domains`: the ten domains, their class counts and official category ids;
- :mod:`.score`: the Decathlon score;
- :mod:`.dataset`: the ``decathlon`` data set (official release or ImageFolder layout);
- :mod:`.annotations`: the official release's COCO-style annotation files, read and checked;
- :mod:`.synthetic`: the ``synthetic_decathlon`` data set and the official layout writer;
- :mod:`.stats`, :mod:`.mean_std`: per-domain normalisation statistics;
- :mod:`.submission`: the test server's submission zip;
- :mod:`.commands`: ``mtlkit data synth-decathlon`` and ``mtlkit decathlon submit``;
- :mod:`.compare`: the ``mean`` and ``score`` columns of ``mtlkit compare``.

The core knows none of this: the domain-specific layers its networks use are the generic
many-to-many ones of :mod:`mtlkit.domains`.
"""
