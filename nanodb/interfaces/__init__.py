"""The interfaces: command line, console, HTTP server (JSON API and web UI) and thumbnails.

Each is a thin layer over the NanoDB API (nanodb.database): it never touches the item store or the
vector index directly, and every query goes through NanoDB.search.
"""
