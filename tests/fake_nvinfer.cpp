// A stand-in for libnvinfer.so.10 with just a plugin registry that records what is done to it, for
// testing how the native plugin library registers itself when a host only dlopens it (Triton
// server's plugins=, DeepStream, ONNX Runtime's TensorRT EP). Full TensorRT cannot be installed here.
#include <NvInferRuntime.h>

#include <cstring>
#include <string>

using namespace nvinfer1;

namespace
{
std::string gLog;

char const* nameOf(IPluginCreatorInterface const& creator)
{
    // Only V3 creators are registered by the library under test.
    if (std::strcmp(creator.getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
        return "?";
    return static_cast<IPluginCreatorV3One const&>(creator).getPluginName();
}

class RecordingRegistry final : public IPluginRegistry
{
public:
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override
    {
        *n = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override
    {
        gLog += std::string("register ") + ns + "::" + nameOf(creator) + "\n";
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override
    {
        *n = 0;
        return nullptr;
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const& creator) noexcept override
    {
        gLog += std::string("deregister ") + nameOf(creator) + "\n";
        return true;
    }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override
    {
        *n = 0;
        return nullptr;
    }
};
} // namespace

extern "C" IPluginRegistry* getPluginRegistry() noexcept
{
    static RecordingRegistry registry;
    return &registry;
}

extern "C" char const* fake_registry_log()
{
    return gLog.c_str();
}
