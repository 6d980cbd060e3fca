//go:build unix

package graceful

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// handoffPair returns both ends of a hand-off channel, closed when the test
// ends.
func handoffPair(t *testing.T) (*handoff, *handoff) {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	a, theirs, err := newHandoffPair(log)
	require.NoError(t, err)
	defer theirs.Close()
	b, err := handoffFromFile(theirs, log)
	require.NoError(t, err)
	t.Cleanup(func() {
		a.close()
		b.close()
	})
	return a, b
}

// TestHandoffBothWays passes a connection, with the bytes its client has
// already sent, from one end of a hand-off channel to the other and back:
// old to new as at an upgrade, new to old as the way back needs. When one
// end closes, the other's receive loop ends and its inboxes finish.
func TestHandoffBothWays(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	a, b := handoffPair(t)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	inA, inB := newInboxes(log), newInboxes(log)
	boxA, boxB := inA.register(ln.Addr(), newTracker("a")), inB.register(ln.Addr(), newTracker("b"))
	a.receive(inA.deliver, inA.finish)
	b.receive(inB.deliver, inB.finish)

	for _, dir := range []struct {
		name     string
		from     *handoff
		toInbox  *inbox
		greeting string
	}{{"old to new", a, boxB, "to the new process"}, {"new to old", b, boxA, "and back"}} {
		client, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		defer client.Close()
		server, err := ln.Accept()
		require.NoError(t, err)
		_, err = io.WriteString(client, dir.greeting)
		require.NoError(t, err)
		require.NoError(t, dir.from.send(ln.Addr().String(), server), dir.name)
		server.Close() // the sender's descriptor is its own to close

		got, err := dir.toInbox.Accept()
		require.NoError(t, err, dir.name)
		defer got.Close()
		got.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, len(dir.greeting))
		_, err = io.ReadFull(got, buf)
		require.NoError(t, err, dir.name)
		assert.Equal(t, dir.greeting, string(buf), "%s: unread bytes travel with the connection", dir.name)
		_, err = io.WriteString(got, "ok")
		require.NoError(t, err)
		client.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(client, buf[:2])
		require.NoError(t, err)
		assert.Equal(t, "ok", string(buf[:2]), "%s: the client talks to the receiver", dir.name)
	}

	assert.Error(t, a.send("unknown", &net.UnixConn{}), "a connection without a descriptor is refused")
	a.close()
	b.wait()
	a.wait()
	_, err = boxB.Accept()
	assert.ErrorIs(t, err, net.ErrClosed, "the other end is gone: nothing more arrives")
	var none *handoff
	assert.ErrorIs(t, none.send("k", nil), errNoHandoff, "a nil handoff cannot hand off")
}

// A message carries up to maxBatch descriptors, each with its own listener
// key; concurrent sends share messages.
func TestHandoffBatches(t *testing.T) {
	const n = 2*maxBatch + 7
	a, b := handoffPair(t)
	type got struct {
		key string
		tag byte
	}
	received := make(chan got, 2*n)
	b.receive(func(key string, c net.Conn) {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 1)
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Error(err)
		}
		received <- got{key, buf[0]}
	}, func() {})

	// key returns the key of connection i; tags wrap at 256, a multiple of 4.
	key := func(i int) string { return fmt.Sprintf("listener-%d", i%4) }
	conns := make([]net.Conn, n)
	for i := range conns {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		require.NoError(t, err)
		ours, theirs := os.NewFile(uintptr(fds[0]), "ours"), os.NewFile(uintptr(fds[1]), "theirs")
		conns[i], err = net.FileConn(ours)
		ours.Close()
		require.NoError(t, err)
		defer conns[i].Close()
		_, err = theirs.Write([]byte{byte(i), byte(i)}) // waits in conns[i]'s socket, twice
		theirs.Close()
		require.NoError(t, err)
	}

	// Full messages, as the group commit builds them.
	for start := 0; start < n; start += maxBatch {
		var batch []*outgoing
		for i := start; i < min(start+maxBatch, n); i++ {
			raw, err := conns[i].(syscall.Conn).SyscallConn()
			require.NoError(t, err)
			o := &outgoing{entry: handoffEntry(key(i), conns[i])}
			require.NoError(t, raw.Control(func(fd uintptr) { o.fd = int(fd) }))
			batch = append(batch, o)
		}
		require.NoError(t, a.sendBatch(batch))
	}
	// The same connections again, through concurrent sends.
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() { assert.NoError(t, a.send(key(i), c)) })
	}
	wg.Wait()
	for range 2 * n {
		g := <-received
		assert.Equal(t, key(int(g.tag)), g.key, "descriptor %d arrived with the key it was sent with", g.tag)
	}
}

// A received TCP connection behaves as a net.Conn from the net package
// would, for everything net/http and the drain rely on: its addresses, the
// bytes already sent, timeouts as net.Error, the half-close, a second
// hand-off, net.ErrClosed after Close, io.EOF at the peer's FIN.
func TestHandedConn(t *testing.T) {
	a, b := handoffPair(t)
	received := make(chan net.Conn, 1)
	b.receive(func(key string, c net.Conn) {
		assert.Equal(t, "k", key)
		received <- c
	}, func() {})
	back := make(chan net.Conn, 1)
	a.receive(func(_ string, c net.Conn) { back <- c }, func() {})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer client.Close()
	served, err := ln.Accept()
	require.NoError(t, err)
	_, err = io.WriteString(client, "hello")
	require.NoError(t, err)
	require.NoError(t, a.send("k", served))
	served.Close()

	var c net.Conn
	select {
	case c = <-received:
	case <-time.After(10 * time.Second):
		t.Fatal("nothing received")
	}
	defer c.Close()
	require.IsType(t, &handedConn{}, c, "the cheap path, not net.FileConn")
	assert.Equal(t, client.LocalAddr().String(), c.RemoteAddr().String())
	assert.Equal(t, client.RemoteAddr().String(), c.LocalAddr().String())
	assert.Equal(t, "tcp", c.LocalAddr().Network())

	buf := make([]byte, 5)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	assert.Equal(t, "hello", string(buf), "bytes sent before the hand-off")

	c.SetReadDeadline(time.Unix(1, 0))
	_, err = c.Read(buf)
	var ne net.Error
	require.ErrorAs(t, err, &ne, "net/http tells a timeout by net.Error")
	assert.True(t, ne.Timeout())
	assert.ErrorIs(t, err, os.ErrDeadlineExceeded)

	_, err = io.WriteString(c, "world")
	require.NoError(t, err)
	require.NoError(t, c.(interface{ CloseWrite() error }).CloseWrite())
	got, err := io.ReadAll(client)
	require.NoError(t, err, "the client reads our FIN")
	assert.Equal(t, "world", string(got))

	// Handed on again: the other way, as a later upgrade would.
	_, err = io.WriteString(client, "again")
	require.NoError(t, err)
	require.NoError(t, b.send("k", c))
	c.Close()
	_, err = c.Read(buf)
	assert.ErrorIs(t, err, net.ErrClosed)
	select {
	case c = <-back:
	case <-time.After(10 * time.Second):
		t.Fatal("nothing received back")
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	assert.Equal(t, "again", string(buf))
	client.Close()
	_, err = c.Read(buf)
	assert.Equal(t, io.EOF, err, "the peer's FIN")
}
