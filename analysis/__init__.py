"""Turn many hpcfl results files into tables and figures."""
