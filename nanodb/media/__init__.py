"""The media layer: every file nanodb reads enters here. The formats it reads (`formats`), file kinds and
names (`paths`), the one safe opener that turns bytes into pixels, whatever the format (`opener`), and
what is kept of a file: its record and the one content hash (`record`)."""
