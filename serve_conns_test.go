//go:build unix

package graceful

import (
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// HandOff takes only ServeConns connections, and passes each once: a
// second call is refused and the successor gets one descriptor.
func TestHandOffOnce(t *testing.T) {
	ours, peer := handoffPair(t)
	p := &Process{life: newLifecycle(), toSuccessor: ours}
	p.life.phase.Store(int32(PhaseHandingOver))

	_, server := tcpPair(t)
	httpConn := newTracker("127.0.0.1:80").add(server)
	assert.ErrorContains(t, p.HandOff(httpConn), "not a connection from ServeConns", "a hijacked HTTP connection")

	raw := newTracker("127.0.0.1:81")
	raw.raw = true
	_, server2 := tcpPair(t)
	c := raw.add(server2)
	require.NoError(t, p.HandOff(c))
	assert.Equal(t, connHanded, c.state())
	assert.ErrorContains(t, p.HandOff(c), "connection already handed")
	assert.EqualValues(t, 1, raw.handed.Load())

	got := make(chan string, 4)
	peer.receive(func(key string, c net.Conn) {
		c.Close()
		got <- key
	}, func() { close(got) })
	assert.Equal(t, "127.0.0.1:81", <-got)
	ours.close()
	select {
	case key, ok := <-got:
		assert.False(t, ok, "a second descriptor arrived for %s", key)
	case <-time.After(5 * time.Second):
		t.Fatal("the receiver did not see the channel close")
	}
}
