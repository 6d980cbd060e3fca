package graceful

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// tcpPair returns both ends of a TCP connection on 127.0.0.1, closed when
// the test ends.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	server, err = ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return client, server
}

// idleConn tracks server as an idle keep-alive connection of a tracker that
// hands off with send.
func idleConn(t *testing.T, server net.Conn, send func(net.Conn) error) *trackedConn {
	t.Helper()
	tr := newTracker("127.0.0.1:80")
	tc := tr.add(server)
	tr.mu.Lock()
	tc.http = http.StateIdle
	tr.setSend(send)
	tr.mu.Unlock()
	return tc
}

func claim(tc *trackedConn) bool {
	tc.t.mu.Lock()
	defer tc.t.mu.Unlock()
	return tc.claimLocked()
}

// TestConnTransitions checks the table: every transition it lists is
// allowed, and to refuses every other, even from the right state.
func TestConnTransitions(t *testing.T) {
	listed := map[[2]connState]bool{}
	for from, tos := range connTransitions {
		for _, to := range tos {
			listed[[2]connState{connState(from), to}] = true
		}
	}
	assert.Len(t, listed, 13, "the table in conn.go's comment has 13 transitions")
	for from := connFresh; from <= connDone; from++ {
		for to := connFresh; to <= connDone; to++ {
			c := &trackedConn{}
			c.word.Store(int32(from | readingBit))
			ok := c.to(from, to)
			assert.Equal(t, listed[[2]connState{from, to}], ok, "%v -> %v", from, to)
			if ok {
				assert.Equal(t, to|readingBit, connState(c.word.Load()), "the reading bit is kept")
			} else {
				assert.Equal(t, from|readingBit, connState(c.word.Load()), "a refused transition changes nothing")
			}
		}
	}
	assert.Equal(t, "handing", connHanding.String())
	assert.Equal(t, "seen", (connSeen | readingBit).String())
}

// A Read already in the socket when the claim is made, which returns
// bytes, beats the claim: the bytes are served here and the claim's
// deadline is undone. The hook orders the claim between the socket read
// and the state change, the window a scheduler could hit.
func TestClaimLosesToArrivingByte(t *testing.T) {
	client, server := tcpPair(t)
	tc := idleConn(t, server, func(net.Conn) error { return errors.New("not sent") })
	_, err := client.Write([]byte("G"))
	require.NoError(t, err)
	claimed := false
	tc.t.testAfterRead = func([]byte) { claimed = claim(tc) }
	buf := make([]byte, 8)
	n, err := tc.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "G", string(buf[:n]), "the byte is served here")
	assert.True(t, claimed, "the claim was made after the socket read, before the state change")
	assert.Equal(t, connSeen, tc.state(), "the arriving byte cancelled the claim")

	tc.t.testAfterRead = nil
	_, err = client.Write([]byte("ET"))
	require.NoError(t, err)
	n, err = tc.Read(buf)
	require.NoError(t, err, "the claim's deadline was undone")
	assert.Equal(t, "ET", string(buf[:n]))
}

// A claim made before the bytes arrive wins: net/http's next Read gets EOF
// and reads nothing, so the request stays in the socket for the successor.
func TestClaimBeforeByteLeavesItInSocket(t *testing.T) {
	client, server := tcpPair(t)
	tc := idleConn(t, server, nil)
	require.True(t, claim(tc))
	_, err := client.Write([]byte("GET / HTTP/1.1\r\n"))
	require.NoError(t, err)
	n, err := tc.Read(make([]byte, 64))
	assert.Equal(t, 0, n)
	assert.ErrorIs(t, err, io.EOF)
	assert.False(t, claim(tc), "a claimed connection is not claimed twice")

	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	_, err = io.ReadFull(server, buf)
	require.NoError(t, err)
	assert.Equal(t, "GET / HTTP/1.1\r\n", string(buf), "every byte is still in the socket")
}

// A Close while a Read is in the socket does nothing (net/http closes again
// once the Read returns); the claim's deadline wakes a blocked Read with
// EOF; the Close after it hands the connection over with the request the
// client sent meanwhile intact.
func TestClaimWakesBlockedRead(t *testing.T) {
	client, server := tcpPair(t)
	received := make(chan net.Conn, 1)
	tc := idleConn(t, server, func(c net.Conn) error {
		f, err := c.(*net.TCPConn).File() // what the successor gets: a duplicate
		if err != nil {
			return err
		}
		defer f.Close()
		dup, err := net.FileConn(f)
		received <- dup
		return err
	})
	readDone := make(chan error, 1)
	go func() {
		_, err := tc.Read(make([]byte, 64))
		readDone <- err
	}()
	for i := 0; connState(tc.word.Load())&readingBit == 0; i++ {
		require.Less(t, i, 5000, "the Read never reached the socket")
		time.Sleep(time.Millisecond)
	}
	// Claimed, but its deadline not set yet: the Read stays in the socket.
	tc.t.mu.Lock()
	tc.handDone = make(chan struct{})
	require.True(t, tc.to(connFresh, connClaimed))
	tc.t.mu.Unlock()
	require.NoError(t, tc.Close(), "Close while the Read is in the socket")
	assert.Equal(t, connClaimed, tc.state(), "that Close did nothing")
	assert.Equal(t, 1, tc.t.len())

	tc.Conn.SetReadDeadline(time.Unix(1, 0)) // the claim's deadline
	assert.ErrorIs(t, <-readDone, io.EOF)
	_, err := client.Write([]byte("ping"))
	require.NoError(t, err)
	require.NoError(t, tc.Close())
	assert.Equal(t, connHanded, tc.state())
	assert.EqualValues(t, 1, tc.t.handed.Load())
	assert.Zero(t, tc.t.len(), "our descriptor is closed")
	dup := <-received
	defer dup.Close()
	dup.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4)
	_, err = io.ReadFull(dup, buf)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(buf), "the successor reads what was sent during the hand-off")
}

// net/http may Close a claimed connection from two goroutines: the second
// Close must not close the descriptor while the first is sending it.
// synctest.Wait proves the second is blocked, not merely slow.
func TestDoubleCloseHandsOffOnce(t *testing.T) {
	client, server := tcpPair(t)
	synctest.Test(t, func(t *testing.T) {
		sending, release := make(chan struct{}), make(chan struct{})
		sends := 0
		tc := idleConn(t, server, func(c net.Conn) error {
			sends++
			close(sending)
			<-release
			_, err := c.(*net.TCPConn).SyscallConn() // still open while sent
			return err
		})
		require.True(t, claim(tc))
		first, second := make(chan error, 1), make(chan error, 1)
		go func() { first <- tc.Close() }()
		<-sending
		go func() { second <- tc.Close() }()
		synctest.Wait()
		select {
		case <-second:
			t.Fatal("the second Close returned while the first was sending")
		default:
		}
		assert.Equal(t, 1, tc.t.len(), "the descriptor is still open")
		close(release)
		require.NoError(t, <-first)
		require.NoError(t, <-second)
		assert.Equal(t, 1, sends, "handed off once")
		assert.Equal(t, connHanded, tc.state())
		assert.Zero(t, tc.t.len())
	})
	_ = client
}

// A hand-off whose send fails retires the connection instead: the client
// gets a FIN (EOF, not a reset), the failure is counted, and the descriptor
// is closed once the peer has closed or the linger timer has fired.
func TestHandOffSendFails(t *testing.T) {
	client, server := tcpPair(t)
	tc := idleConn(t, server, func(net.Conn) error { return errors.New("successor not reading") })
	require.True(t, claim(tc))
	require.NoError(t, tc.Close())
	assert.Equal(t, connRetired, tc.state())
	assert.EqualValues(t, 1, tc.t.kept.Load())
	assert.Zero(t, tc.t.handed.Load())

	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := client.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF, "a FIN, not a reset")
	client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, tc.t.waitEmpty(ctx), "the linger timer closes our end")
	assert.Equal(t, connDone, tc.state())
}

// Write marks the start of a response: a connection that was read from is
// fresh again, so that the next request's bytes are "seen" anew.
func TestWriteMarksResponse(t *testing.T) {
	client, server := tcpPair(t)
	tc := idleConn(t, server, nil)
	_, err := client.Write([]byte("x"))
	require.NoError(t, err)
	_, err = tc.Read(make([]byte, 4096)) // net/http's bufio reads
	require.NoError(t, err)
	assert.Equal(t, connSeen, tc.state())
	assert.False(t, claim(tc), "never claimed while a request is in")
	assert.False(t, tc.retire(), "never retired while a request is in")
	_, err = tc.Write([]byte("y"))
	require.NoError(t, err)
	assert.Equal(t, connFresh, tc.state())
	assert.True(t, tc.retire())
}

// A pipelining client: net/http's 1-byte background read takes the first
// byte of the next request while the handler of the current one runs,
// before its response begins. The response must not make the connection
// fresh, or the claim that follows at StateIdle would send the socket to
// the successor without that byte (the successor would read "ET / ...").
// It is fresh again only after the next request's response begins.
func TestPipelinedByteHeldThroughResponse(t *testing.T) {
	client, server := tcpPair(t)
	tc := idleConn(t, server, func(net.Conn) error { return errors.New("must not be sent") })
	req := "GET /1 HTTP/1.1\r\n\r\n"
	_, err := client.Write([]byte(req))
	require.NoError(t, err)
	_, err = io.ReadFull(tc, make([]byte, len(req))) // as net/http's bufio reads it
	require.NoError(t, err)
	tc.t.setHTTPState(tc, http.StateActive)
	_, err = client.Write([]byte("G")) // the client pipelines the next request
	require.NoError(t, err)
	n, err := tc.Read(make([]byte, 1)) // the background read, handler running
	require.NoError(t, err)
	require.Equal(t, 1, n)
	_, err = tc.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
	require.NoError(t, err)
	assert.Equal(t, connSeen, tc.state(), "net/http holds a byte of the next request")
	tc.t.setHTTPState(tc, http.StateIdle) // where the drain claims idle connections
	assert.Equal(t, connSeen, tc.state(), "not claimed")
	assert.False(t, claim(tc))
	assert.False(t, tc.retire())

	tc.t.setHTTPState(tc, http.StateActive) // request 2 is served here
	_, err = tc.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
	require.NoError(t, err)
	assert.Equal(t, connFresh, tc.state(), "after request 2's response nothing is held")
	tc.t.setHTTPState(tc, http.StateIdle)
	assert.Equal(t, connClaimed, tc.state(), "claimed at its next idle moment")
}

// An h2c preface is recognised however it is split across reads.
func TestH2CPrefaceSplit(t *testing.T) {
	for _, split := range []int{1, 2, 3, 4, 10} {
		client, server := tcpPair(t)
		tc := idleConn(t, server, nil)
		preface := []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
		for _, part := range [][]byte{preface[:split], preface[split:]} {
			_, err := client.Write(part)
			require.NoError(t, err)
			_, err = io.ReadFull(tc, make([]byte, len(part)))
			require.NoError(t, err)
		}
		assert.True(t, tc.h2.Load(), "split after %d bytes", split)
	}
	client, server := tcpPair(t)
	tc := idleConn(t, server, nil)
	_, err := client.Write([]byte("PR"))
	require.NoError(t, err)
	_, err = io.ReadFull(tc, make([]byte, 2))
	require.NoError(t, err)
	_, err = client.Write([]byte("OPFIND / HTTP/1.1\r\n"))
	require.NoError(t, err)
	_, err = io.ReadFull(tc, make([]byte, 4))
	require.NoError(t, err)
	assert.False(t, tc.h2.Load(), "HTTP/1 PROPFIND is not HTTP/2")
}

// Invariant 5: an expiry loses to a complete request. A request that has
// begun to arrive is expired only while net/http reports the connection
// idle or new and its reader is blocked in the socket for more.
func TestExpireLosesToCompleteRequest(t *testing.T) {
	cases := []struct {
		name    string
		http    http.ConnState
		word    connState
		expired bool
	}{
		{"reader blocked for more of the request", http.StateIdle, connSeen | readingBit, true},
		{"new connection, reader blocked", http.StateNew, connSeen | readingBit, true},
		{"last header byte read, net/http parsing", http.StateIdle, connSeen, false},
		{"reported active: being served", http.StateActive, connSeen | readingBit, false},
		{"nothing arrived: retire, not expire", http.StateIdle, connFresh | readingBit, false},
	}
	for _, c := range cases {
		_, server := tcpPair(t)
		tc := idleConn(t, server, nil)
		tc.t.mu.Lock()
		tc.http = c.http
		tc.word.Store(int32(c.word))
		got := tc.expireLocked()
		tc.t.mu.Unlock()
		assert.Equal(t, c.expired, got, c.name)
		if c.expired {
			assert.Equal(t, connRetired, tc.state(), c.name)
		} else {
			assert.Equal(t, c.word, connState(tc.word.Load()), "%s: unchanged", c.name)
		}
	}
}

// len returns how many connections are open.
func (t *tracker) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}
