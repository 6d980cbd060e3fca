package graceful

import (
	"net"
	"net/http"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSameAddr(t *testing.T) {
	tcp := func(s string) net.Addr { a, _ := net.ResolveTCPAddr("tcp", s); return a }
	udp := func(s string) net.Addr { a, _ := net.ResolveUDPAddr("udp", s); return a }
	cases := []struct {
		network, addr string
		have          net.Addr
		want          bool
	}{
		{"tcp", "127.0.0.1:8080", tcp("127.0.0.1:8080"), true},
		{"tcp", "127.0.0.1:8081", tcp("127.0.0.1:8080"), false},
		{"tcp", ":8080", tcp("[::]:8080"), true},
		{"tcp", ":8080", tcp("0.0.0.0:8080"), true},
		{"tcp", ":8080", tcp("127.0.0.1:8080"), false},
		{"tcp4", "0.0.0.0:8080", tcp("[::]:8080"), true},
		{"udp", "127.0.0.1:53", udp("127.0.0.1:53"), true},
		{"tcp", "127.0.0.1:53", udp("127.0.0.1:53"), false},
		{"unix", "/run/app.sock", &net.UnixAddr{Name: "/run/app.sock", Net: "unix"}, true},
		{"unix", "/run/./app.sock", &net.UnixAddr{Name: "/run/app.sock", Net: "unix"}, true},
		{"unix", "/run/other.sock", &net.UnixAddr{Name: "/run/app.sock", Net: "unix"}, false},
		{"tcp", "not an address", tcp("127.0.0.1:8080"), false},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, sameAddr(c.network, c.addr, c.have), "%s %s vs %v", c.network, c.addr, c.have)
	}
}

func TestTrackerCountsAndCloses(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	tr := newTracker(ln.Addr().String())
	tl := &trackedListener{Listener: ln, t: tr}
	defer tl.Close()

	clients := make([]net.Conn, 3)
	for i := range clients {
		clients[i], err = net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		defer clients[i].Close()
	}
	var server []net.Conn
	for range clients {
		c, err := tl.Accept()
		require.NoError(t, err)
		server = append(server, c)
	}
	assert.Equal(t, 3, tr.len())
	tr.setHTTPState(server[0], http.StateIdle)
	tr.setHTTPState(server[1], http.StateHijacked)
	assert.Equal(t, http.StateIdle, server[0].(*trackedConn).http)

	require.NoError(t, server[2].Close())
	require.NoError(t, server[2].Close(), "a second Close is harmless")
	assert.Equal(t, 2, tr.len())
	assert.Equal(t, 2, tr.closeAll())
	assert.Equal(t, 0, tr.len())
	buf := make([]byte, 1)
	_, err = clients[1].Read(buf)
	assert.Error(t, err, "the hijacked connection was closed")

	require.NoError(t, tl.Close())
	require.NoError(t, tl.Close(), "a second Close returns the first result")
	_, err = tl.Accept()
	assert.ErrorIs(t, err, net.ErrClosed)
}

// stubConn is the smallest net.Conn: tracking is all that is measured.
type stubConn struct{ net.Conn }

// BenchmarkTrackingBytesPerConn reports the heap that tracking one
// connection costs (trackedConn plus its map entry); the target is 256 B.
func BenchmarkTrackingBytesPerConn(b *testing.B) {
	const n = 100_000
	conns := make([]net.Conn, n)
	for i := range conns {
		conns[i] = &stubConn{}
	}
	for range b.N {
		tr := newTracker("bench")
		before := heapAlloc()
		for _, c := range conns {
			tr.add(c)
		}
		after := heapAlloc()
		b.ReportMetric(float64(after-before)/n, "B/conn")
		runtime.KeepAlive(tr)
	}
}

func heapAlloc() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
