"""Pushes routed while their connection is writing: handed to the writer, never lost."""
import threading

from conftest import WAIT, Wire, parse_message, publish_line


def _connection_of(server, wire):
    """The broker's Connection handler for the client socket ``wire``."""
    port = wire.sock.getsockname()[1]
    with server._connections_lock:
        (conn,) = [c for c in server._connections if c.client_address[1] == port]
    return conn


def test_push_routed_while_the_consumer_connection_writes_goes_out_after_that_write(
        start_server):
    """A push routed while its connection's send_lock is held is written by the holder right
    after it releases the lock: the publisher is not held up and no delivery thread is woken."""
    server = start_server()
    woken = []
    call_writer = server.broker.call_writer
    server.broker.call_writer = lambda session: (woken.append(session), call_writer(session))
    sender, receiver = Wire(server.address), Wire(server.address)
    try:
        assert receiver.call("consume default_queue") == "Subscribed to queue"
        conn = _connection_of(server, receiver)
        called = threading.Event()
        write_pushes = conn.session.write_pushes
        conn.session.write_pushes = lambda: (write_pushes(), called.set())
        conn.send_lock.acquire()            # stands in for its reader in the middle of a reply
        try:
            sender.send(publish_line("h-1"))
            assert sender.text() == "ACK h-1"
            assert called.wait(WAIT), "the publisher's reader never waits for the lock"
            assert conn._pushes_due, "the push was left for the lock's holder"
        finally:
            conn.send_lock.release()
        conn._write_due_pushes()            # what every holder does after releasing the lock
        assert parse_message(receiver.line())[0] == "h-1"
        assert not conn._pushes_due
        assert woken == [], "the delivery thread was not needed"
    finally:
        sender.close()
        receiver.close()


def test_lock_step_traffic_with_acks_loses_no_push(start_server):
    """Publish-and-wait-each while the consumer acks every message (its reader writing
    ACK_CONFIRMED as pushes arrive): every message is delivered once, in order."""
    server = start_server()
    sender, receiver = Wire(server.address), Wire(server.address)
    try:
        assert receiver.call("consume default_queue") == "Subscribed to queue"
        confirmed, count = [], 300
        for i in range(count):
            sender.send(publish_line("l-%d" % i))
            assert sender.text() == "ACK l-%d" % i
            line = receiver.text()
            while line.startswith("ACK_CONFIRMED "):
                confirmed.append(line)
                line = receiver.text()
            assert parse_message(line.encode())[0] == "l-%d" % i
            receiver.send(b"ack l-%d\n" % i)
        while len(confirmed) < count:
            confirmed.append(receiver.text())
        assert confirmed == ["ACK_CONFIRMED l-%d" % i for i in range(count)]
    finally:
        sender.close()
        receiver.close()


def test_every_release_of_send_lock_in_connection_is_followed_by_the_due_pushes():
    """Each `with self.send_lock:` block in Connection is followed at once by
    `self._write_due_pushes()`, so a push left for the lock's holder is never stranded."""
    import ast
    import inspect

    from ciphermq import connection

    tree = ast.parse(inspect.getsource(connection))
    checked = 0
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if not isinstance(statements, list):
                continue
            for index, statement in enumerate(statements):
                if not (isinstance(statement, ast.With) and any(
                        ast.unparse(item.context_expr) == "self.send_lock"
                        for item in statement.items)):
                    continue
                following = statements[index + 1] if index + 1 < len(statements) else None
                assert following is not None and \
                    ast.unparse(following) == "self._write_due_pushes()", \
                    "line %d: send_lock released without writing due pushes" % statement.lineno
                checked += 1
    assert checked >= 4
