//go:build !linux

package graceful

import (
	"errors"
	"net"
	"os"
)

// Only Linux's SO_PEERCRED is used to check who talks to the control
// socket; elsewhere New refuses Options.ControlSocket.
const peerCredSupported = false

func peerCred(net.Conn) (uid, pid int, err error) {
	return 0, 0, errors.New("peer credentials are not available on this platform")
}

func chmodSocket(string, os.FileMode) error {
	return errors.New("control sockets are not available on this platform")
}
