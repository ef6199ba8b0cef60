"""The media layer: every file nanodb reads enters here. File kinds and names (`paths`), the one safe
opener that turns bytes into pixels (`opener`), and the content hash."""
