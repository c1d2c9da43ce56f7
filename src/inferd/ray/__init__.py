"""inferd on a Ray cluster: ``inferd ray serve`` (Ray Serve replicas each running the whole inferd
server) and ``inferd batch --engine ray`` (Ray Data). Ray is an optional extra, ``inferd[ray]``,
imported only by the modules of this package that need it, never at import of the package."""
