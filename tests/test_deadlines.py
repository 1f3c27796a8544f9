"""Read deadlines: a client that dribbles a line or goes silent cannot hold a thread forever."""
from conftest import Wire


def test_slow_line_is_dropped_at_the_line_deadline(start_server):
    """Slowloris: a line started and never finished is cut off after --line-timeout."""
    server = start_server(line_timeout=0.3, read_tick=0.05)
    client, bystander = Wire(server.address), Wire(server.address)
    try:
        client.send(b"publish default_exchange default_key {")
        assert client.closed_by_peer()
        assert bystander.call("ping") == "PONG"
    finally:
        client.close()
        bystander.close()


def test_complete_lines_reset_the_line_deadline(start_server):
    """A client sending whole lines is never cut off by the line deadline."""
    server = start_server(line_timeout=0.3, read_tick=0.05)
    client = Wire(server.address)
    try:
        for _ in range(5):
            client.expect_nothing(0.1)
            assert client.call("ping") == "PONG"
    finally:
        client.close()


def test_idle_connection_is_dropped_when_asked(start_server):
    """With --idle-timeout a silent client is disconnected."""
    server = start_server(idle_timeout=0.3, read_tick=0.05)
    client = Wire(server.address)
    try:
        assert client.call("ping") == "PONG"
        assert client.closed_by_peer()
    finally:
        client.close()
