"""Lesson 13: scale out -- the same Sender and Receiver over a 3-node RabbitMQ cluster."""

COUNT = 300
#: The node both scripts use is SIGKILLed once the sender has this many confirms.
KILL_AT = 100


def scale_out(stage):
    """13. Scale out: the same scripts over a RabbitMQ cluster, one node SIGKILLed."""
    cluster = stage.cluster(3)
    private, public = stage.keys()
    urls = [arg for url in cluster.urls for arg in ("--url", url)]
    stage.say("clustered: %s" % "  ".join(cluster.urls))
    receiver = stage.start("Receiver.py", *urls, "--private-key", str(private),
                           "--max-messages", str(COUNT))
    peer = receiver.wait_for(r"Subscribed to \S+ on (\S+)").group(1)
    stage.say("the receiver consumes the quorum queue default_queue through %s" % peer)
    sender = stage.start("Sender.py", *urls, "--public-key", str(public), "--count", str(COUNT),
                         "--record", "sender_record.json", "-v")
    for _ in range(KILL_AT):
        sender.wait_for("Server ACK received")
    node = next(node for node in cluster.nodes if peer.endswith(":%d" % node.port))
    node.kill()
    stage.say("💥 %d confirmed: SIGKILL of %s, the node both scripts are using" % (KILL_AT,
                                                                                 node.name))
    codes = []
    for name, process in (("sender", sender), ("receiver", receiver)):
        codes.append(process.wait())
        moved = [line for line in process.lines if line.startswith("🔌")][:1] + [
            line for line in process.lines if "Subscribed to" in line][1:2]
        for line in moved + process.lines[-1:]:
            stage.say("the %s: %s" % (name, line))
    tally = stage.verdict()
    stage.proves(tally.ok and len(tally.acked) == len(stage.stored()) == COUNT
                 and codes == [0, 0],
                 "a node SIGKILLed mid-stream: %d confirmed, %d stored, exactly once"
                 % (COUNT, COUNT), "exit statuses %s; the checker's verdict is above" % codes)
