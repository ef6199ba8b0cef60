"""The search layer: what a search takes and gives (request: SearchRequest, Filters, SearchResult, the
Searcher protocol), queries and their rules (query: path or text, combined queries, limits), queries
turned into vectors (encoder, fetch), and the searchers that answer them: local (one store, in this
process) and sharded (shards on a Ray cluster)."""
